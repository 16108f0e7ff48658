"""Tasks, scripted experts, data collection and datasets. Depends on no other rtdp package."""
