"""Scan preprocessing: LUNA16 scans and label tables, lung masks, LIDC labels, the demo set, scan workers,
cubes of given nodules straight from a .mhd, NIfTI or DICOM scan (predict.py --SCAN)."""
