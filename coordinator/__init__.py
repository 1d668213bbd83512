"""Optional helpers: bootstrap DHT peer, health monitor, dashboard."""
