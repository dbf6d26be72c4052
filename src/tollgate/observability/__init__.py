"""What the gateway tells its operator (compatibility C54, C55): Prometheus metrics and access logs.

`metrics` holds plain counters the request path adds to and a collector that renders them
when Prometheus scrapes; `calls` is what one deployment call reports when it ends; `logs`
sets up text or JSON logging and writes the access log.
"""
