"""The stages a query passes before it reaches the upstreams, one concern per module."""
