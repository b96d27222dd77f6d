"""The control API: JSON-RPC 2.0 over a Unix socket.

jsonrpc  sans-I/O registry, schema check and dispatcher
methods  VmControl interface and the standard methods
openrpc  the rpc.discover document
server   the asyncio Unix-socket server
"""
