"""Zhipu's Batch API: chunk files, upload, create, poll, harvest, in the native dialect it speaks."""
