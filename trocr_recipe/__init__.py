"""Shared pieces of the TrOCR recipe: both training loops import data, model and metric
code from here, so that they can only differ in the loop itself."""
