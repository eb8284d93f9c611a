"""Records and reports: the run spec and its id, the tidy results CSV, and the markdown reports
with their plots and leaderboards.
"""
