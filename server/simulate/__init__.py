"""``flockctl simulate``: replay a request trace through the daemon's own autoscaler and balancer
in simulated time, against a service model of a worker, and report cost against latency.

``trace`` reads and draws traces, ``service`` models a worker, ``clock`` is the event loop that
runs in simulated time, ``sim`` wires the daemon's controller, pool and policies to them, and
``report`` turns a run into figures, a table, a plot and a sweep's Pareto front.
"""
