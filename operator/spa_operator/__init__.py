"""spa-operator: AlignmentRun spec, SPA planner, local and Kubernetes executors, CLI. Imports no torch."""

__version__ = "0.1.0"
