"""Resources the gateway serves: upstream servers' and its own, each governed as a catalog securable."""
