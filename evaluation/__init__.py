"""Closed-loop runs in simulation: episodes, worker processes, calibration runs (RTI's k0, BAC schedules),
reports, plots and videos, and `rtdp control`'s simulated robot. The policy never knows it is in a simulator: it
is built by deploy.runtime and seen only through the decision contract."""
