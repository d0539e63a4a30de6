"""A trunk prior learnt from images no patient ever made (random processes), so it costs no privacy."""
