"""What runs on the robot: the model kinds (kinds.py), the runtime that builds a runnable policy from a checkpoint
and settings (runtime.py), export and its artefacts, the backends, the profiler, the fixed-rate loop, the decider
and the inference process. Nothing here imports envs/: simulation lives in evaluation/."""
