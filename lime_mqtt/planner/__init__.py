"""The planner service: watches devices, publishes the retained plan."""
