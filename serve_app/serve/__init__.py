"""Ray Serve shells: the application builder, the ingress, the encoder replica, autoscaling, metrics."""
