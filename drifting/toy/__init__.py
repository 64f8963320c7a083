"""2-D toy experiments (the paper's Figures 3 and 4)."""
