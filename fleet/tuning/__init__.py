"""The healing tuner: replays the mesh's history through the pure rules, evolves thresholds."""
