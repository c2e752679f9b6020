"""Whole-project pre-annotation as a resumable job: every task of a Label Studio project that lacks a stored
prediction for the current model version is predicted, stored, and written into Label Studio in bulk."""
