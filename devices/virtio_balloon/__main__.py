from devices.runtime import main

main("virtio_balloon")
