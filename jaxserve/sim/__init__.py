"""Workload replay: a discrete-event simulator and a real-time engine driver sharing one format."""
