"""SPA stage workers: generate, judge, train, evaluate. Each is `spa-worker <stage> ...`."""

__version__ = "0.1.0"
