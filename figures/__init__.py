"""Figures of runs: cells, curves, ROC, confusion, k-fold table, LayerCAM, and the numbers behind them."""
