"""Export, backends, the fixed-rate control loop and the profiler: later issues."""
