"""torchrun for one machine, with every socket on the loopback interface.

    python -m pipelines.ddp_launch --nproc-per-node N -m pipelines.train_worker ...

``torchrun --standalone`` hosts its rendezvous store (a ``TCPStore``) on *every* interface (``*:port``): on a
shared machine anyone who can reach it can join or disturb the run. ``TCPStore`` has no bind-address option,
but it accepts a socket that is already listening, so this launcher registers a rendezvous backend
(``loopback``) whose store listens on a socket bound to 127.0.0.1, and then runs torchrun itself
(``torch.distributed.run``: the same agent, restarts, signal forwarding and exit codes). The ranks connect to
that store as clients (torchrun's agent store), and gloo and NCCL are pointed at the loopback interface
(``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME=lo``, unless already set), so nothing listens beyond 127.0.0.1.
Several nodes need a reachable address and are what torchrun itself is for (docs/ddp.md).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import RendezvousInfo, RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous

BACKEND = "loopback"
HOST = "127.0.0.1"


class LoopbackRendezvous(StaticTCPRendezvous):
    """torchrun's static rendezvous, with the store listening on 127.0.0.1 only (one node)."""

    def get_backend(self) -> str:
        return BACKEND

    def next_rendezvous(self) -> RendezvousInfo:
        if self._store is None:
            self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._socket.bind((HOST, self.master_port))
            self._socket.listen(128)
            self.master_port = self._socket.getsockname()[1]
            self._store = TCPStore(HOST, self.master_port, self.world_size, True, self.timeout, multi_tenant=True,
                                   master_listen_fd=self._socket.fileno())
        return super().next_rendezvous()


def create_handler(params: RendezvousParameters) -> LoopbackRendezvous:
    return LoopbackRendezvous(HOST, 0, 0, 1, params.run_id, int(params.config.get("timeout", 600)))


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv[:1]):
        print(__doc__)
        return 0
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    rendezvous_handler_registry.register(BACKEND, create_handler)
    run.main(["--nnodes=1", f"--rdzv-backend={BACKEND}", f"--rdzv-endpoint={HOST}:0",
              f"--rdzv-id=seqvision-{os.getpid()}-{datetime.datetime.now():%H%M%S}", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
