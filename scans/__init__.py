"""Scan preprocessing: LUNA16 scans and label tables, lung masks, LIDC labels, the demo set, scan workers."""
