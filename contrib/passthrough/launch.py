#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Start QEMU with a passthrough (VFIO cdev) device whose DMA our
virtio-iommu backend governs: open /dev/iommu and the cdev once, create the
vhost-user listening socket, and hand the same open files to both processes,
as libvirt hands fds to QEMU. See README.md here and
spec-notes/passthrough.md.

usage: launch.py --cdev /dev/vfio/devices/vfioN --endpoint 0x20
                 [--backend vhost-device-iommu] [--backend-arg ARG]...
                 [--socket PATH] -- qemu-system-x86_64 ARGS...

In the QEMU arguments, {IOMMUFD}, {CDEV} and {SOCKET} are replaced by the
iommufd's fd number, the cdev's fd number and the socket's path. QEMU must
realize -device vfio-pci before the vhost-user device (command-line order).
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cdev", required=True, help="/dev/vfio/devices/vfioN (bound to vfio-pci)")
    ap.add_argument("--endpoint", required=True, help="the device's endpoint ID in the guest")
    ap.add_argument("--iommu", default="/dev/iommu")
    ap.add_argument("--backend", default="vhost-device-iommu")
    ap.add_argument("--backend-arg", action="append", default=[])
    ap.add_argument("--socket", help="vhost-user socket path (default: a temporary one)")
    ap.add_argument("qemu", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    qemu = a.qemu[1:] if a.qemu[:1] == ["--"] else a.qemu
    if not qemu:
        ap.error("no QEMU command after --")

    # One open file each: the kernel binds a cdev once (QEMU does it), and
    # the iommufd objects of both processes must live in one context.
    iommufd = os.open(a.iommu, os.O_RDWR | os.O_CLOEXEC)
    cdev = os.open(a.cdev, os.O_RDWR | os.O_CLOEXEC)
    # The socket exists before QEMU starts: QEMU connects when it creates
    # the chardev, before it realizes any device, while the backend is
    # still waiting for QEMU's bind.
    path = a.socket or os.path.join(tempfile.mkdtemp(prefix="viommu-"), "viommu.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    fds = (iommufd, cdev, lsock.fileno())

    backend = subprocess.Popen(
        [a.backend, "--socket-fd", str(lsock.fileno()), "--iommufd-fd", str(iommufd),
         "--endpoint", f"{a.endpoint},vfio-bound-fd={cdev}"] + a.backend_arg,
        pass_fds=fds)
    subst = {"{IOMMUFD}": str(iommufd), "{CDEV}": str(cdev), "{SOCKET}": path}
    args = []
    for arg in qemu:
        for k, v in subst.items():
            arg = arg.replace(k, v)
        args.append(arg)
    vm = subprocess.Popen(args, pass_fds=(iommufd, cdev))
    # The children own their copies now; ours would keep the device bound
    # after both exit.
    for fd in fds:
        os.close(fd)
    lsock.detach()
    rc = vm.wait()
    backend.terminate()
    backend.wait()
    return rc


if __name__ == "__main__":
    sys.exit(main())
