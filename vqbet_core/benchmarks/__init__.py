"""The published results as data: each row's commands, the figure it published and its tolerance."""
