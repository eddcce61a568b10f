"""The operator's console: the jobs API and its live streams, the admin pages and the dashboard,
the reads behind them (selectors) and the operations (cancel, retry, pause, purge, rescue).
"""
