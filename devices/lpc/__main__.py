from devices.runtime import main

main("lpc")
