"""Datasets for training and evaluation: the catalog (download, verify, unpack: `data get`), the
official layouts as read for train and eval, synthetic scenes."""
