"""Several Ray nodes on one machine (Ray's ``cluster_utils.Cluster``), on a machine where no Ray ran before.

``Cluster`` records the head's address in ``<Ray's default temp dir>/ray_current_cluster``
(``$RAY_TMPDIR/ray``, else ``$TMPDIR/ray``, else ``/tmp/ray``) whatever temp dir its nodes are
given, and fails with ``FileNotFoundError`` where that folder does not exist yet: on a fresh
machine, or under a fresh ``TMPDIR``. So it is created first.
"""

from __future__ import annotations

import os


def start_cluster(head_node_args: dict):
    """A ``ray.cluster_utils.Cluster`` with its head started (``head_node_args`` as ``Cluster`` takes them)."""
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    return Cluster(initialize_head=True, head_node_args=head_node_args)
