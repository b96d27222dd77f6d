"""A stand-in device process for tests/integration/test_sandbox.py.

    sandbox_probe.py supervise DEADLINE -- ARGV...
        Child subreaper (like vmmd): runs ARGV, reaps every descendant,
        prints "REAPED <pid> exit|signal <n>" per process, and after DEADLINE
        seconds kills whatever children it still has, so a stuck probe can
        never hang the test run.

    sandbox_probe.py device MODE ENDPOINT WORKDIR [POLICY [LOOP]]
        Does what a device does: isolate() first, then imports, opens
        backends (a pipe, a socketpair, a listening unix socket, a log file),
        connects a zmq PAIR socket to ENDPOINT and handshakes, enters the
        jail, and serves commands (msgpack maps) on a uvloop loop.
        POLICY: "lpc" (default) or "base". LOOP: "after" (default: the loop
        is created after the jail, handshake by blocking poll) or "before"
        (handshake, jail and serving all inside one running loop, the way
        devices/runtime.py does it).
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from sandbox import namespaces  # noqa: E402  (stdlib + ctypes only: no threads)


def supervise(deadline: float, argv: list[str]) -> int:
    import signal
    import subprocess

    from sandbox.limits import PR_SET_CHILD_SUBREAPER, prctl

    prctl(PR_SET_CHILD_SUBREAPER, 1)

    def kill_children(_signum, _frame):
        me = str(os.getpid())
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/status") as f:
                    ppid = next(line.split()[1] for line in f if line.startswith("PPid:"))
            except (OSError, StopIteration):
                continue
            if ppid == me:
                try:
                    os.kill(int(name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGALRM, kill_children)
    signal.setitimer(signal.ITIMER_REAL, deadline)
    subprocess.Popen(argv)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if os.WIFSIGNALED(status):
            line = f"REAPED {pid} signal {os.WTERMSIG(status)}\n"
        else:
            line = f"REAPED {pid} exit {os.WEXITSTATUS(status)}\n"
        os.write(1, line.encode())
    return 0


def device(mode: str, endpoint: str, workdir: str, policy_name: str = "lpc", loop_at: str = "after") -> int:
    iso = namespaces.isolate(mode)

    # Everything below would be "import the world, open backends, connect".
    import asyncio
    import socket
    import threading

    import msgpack
    import uvloop
    import zmq
    import zmq.asyncio

    from devices.lpc.policy import POLICY as LPC_POLICY
    from sandbox import jail
    from sandbox.seccomp_policy import base_policy

    policy = LPC_POLICY if policy_name == "lpc" else base_policy()

    pipe_r, pipe_w = os.pipe()
    pair_a, pair_b = socket.socketpair()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(workdir, "console.sock"))
    listener.listen(1)
    listener.setblocking(False)
    logfile = open(os.path.join(workdir, "console.log"), "ab", buffering=0)

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(endpoint)
    hello = msgpack.packb({"op": "hello", "entered": sorted(iso.entered)})
    report = None
    if loop_at == "after":
        # Handshake with a blocking poll before any event loop exists.
        raw = zmq.Socket.shadow(sock.underlying)
        raw.send(hello)
        if not raw.poll(20000):
            return 3
        raw.recv()
        report = jail.enter(policy, mode)

    def errinfo(e: BaseException) -> dict:
        return {"ok": False, "error": type(e).__name__, "errno": getattr(e, "errno", None)}

    async def run_op(loop, msg: dict) -> dict:
        op = msg["op"]
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "open":
            try:
                with open(msg["path"], msg.get("how", "rb")):
                    return {"ok": True}
            except OSError as e:
                return errinfo(e)
        if op == "listdir":
            try:
                return {"ok": True, "names": os.listdir(msg["path"])}
            except OSError as e:
                return errinfo(e)
        if op == "socket":
            try:
                socket.socket(msg.get("family", socket.AF_INET), socket.SOCK_STREAM).close()
                return {"ok": True}
            except OSError as e:
                return errinfo(e)
        if op == "timer":
            fired = loop.create_future()
            loop.call_later(0.01, fired.set_result, "later")
            await asyncio.sleep(0.005)
            return {"ok": True, "value": await asyncio.wait_for(fired, 10)}
        if op == "pipe":
            got = loop.create_future()
            loop.add_reader(pipe_r, lambda: got.done() or got.set_result(os.read(pipe_r, 100)))
            os.write(pipe_w, msg["data"])
            try:
                return {"ok": True, "data": await asyncio.wait_for(got, 10)}
            finally:
                loop.remove_reader(pipe_r)
        if op == "socketpair":
            pair_b.setblocking(False)
            pair_a.sendall(msg["data"])
            return {"ok": True, "data": await asyncio.wait_for(loop.sock_recv(pair_b, 100), 10)}
        if op == "accept":
            conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
            with conn:
                data = await asyncio.wait_for(loop.sock_recv(conn, 100), 10)
                await loop.sock_sendall(conn, data.upper())
            return {"ok": True, "data": data}
        if op == "logfile":
            logfile.write(msg["data"])
            return {"ok": True}
        if op == "thread":
            out = []
            t = threading.Thread(target=lambda: out.append(sum(range(1000))))
            t.start()
            t.join(10)
            return {"ok": out == [499500]}
        if op == "zmq_threads":
            # libzmq threads that run for the first time inside the jail (as a
            # starved I/O or reaper thread may at device start): each calls
            # sched_setscheduler(SCHED_OTHER) and prctl(PR_SET_NAME) first.
            late = zmq.Context(io_threads=1)
            a, b = late.socket(zmq.PAIR), late.socket(zmq.PAIR)
            a.bind("inproc://late")
            b.connect("inproc://late")
            a.send(b"late")
            got = b.recv()
            a.close(0)
            b.close(0)
            late.term()
            return {"ok": got == b"late"}
        if op == "executor":
            return {"ok": True, "value": await loop.run_in_executor(None, pow, 2, 10)}
        if op == "fork":
            try:
                pid = os.fork()
            except OSError as e:
                return errinfo(e)
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            return {"ok": True}
        if op == "exec":
            try:
                os.execv("/bin/true", ["true"])
            except OSError as e:
                return errinfo(e)
        if op == "harmless":  # a syscall no policy allows: times(2)
            return {"ok": True, "value": list(os.times())[:2]}
        if op == "traceback":  # linecache tries to open source files
            import traceback
            try:
                raise ValueError("boom")
            except ValueError:
                return {"ok": True, "text": traceback.format_exc()}
        if op == "exit":
            return {"ok": True, "exit": True}
        return {"ok": False, "error": f"unknown op {op}"}

    async def serve() -> int:
        nonlocal report
        loop = asyncio.get_running_loop()
        if report is None:
            await sock.send(hello)
            await asyncio.wait_for(sock.recv(), 20)
            report = jail.enter(policy, mode)
        await sock.send(msgpack.packb({"op": "jailed", "report": report}))
        while True:
            try:
                raw_msg = await asyncio.wait_for(sock.recv(), 30)
            except asyncio.TimeoutError:
                return 4  # the test went away: do not linger
            msg = msgpack.unpackb(raw_msg)
            reply = await run_op(loop, msg)
            await sock.send(msgpack.packb(reply))
            if reply.get("exit"):
                return 0

    status = uvloop.run(serve())
    sock.close()
    ctx.term()
    return status


if __name__ == "__main__":
    if sys.argv[1] == "supervise":
        sys.exit(supervise(float(sys.argv[2]), sys.argv[4:]))
    if sys.argv[1] == "device":
        sys.exit(device(*sys.argv[2:]))
    sys.exit(f"unknown command {sys.argv[1:]}")
