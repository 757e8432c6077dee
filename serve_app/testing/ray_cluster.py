"""Several Ray nodes on one machine (Ray's ``cluster_utils.Cluster``), on a machine where no Ray ran before.

``Cluster`` records the head's address in ``<Ray's default temp dir>/ray_current_cluster``
(``$RAY_TMPDIR/ray``, else ``$TMPDIR/ray``, else ``/tmp/ray``) whatever temp dir its nodes are
given, and fails with ``FileNotFoundError`` where that folder does not exist yet: on a fresh
machine, or under a fresh ``TMPDIR``. So it is created first.

Nodes on one machine share its ports: each is given free ones (:func:`free_port`).
"""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it), for a node or server to bind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(head_node_args: dict):
    """A ``ray.cluster_utils.Cluster`` with its head started (``head_node_args`` as ``Cluster`` takes them)."""
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    return Cluster(initialize_head=True, head_node_args=head_node_args)
