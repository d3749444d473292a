"""Redis Cluster, Sentinel, and several workers on several queues."""
