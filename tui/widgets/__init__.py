"""The dashboard's panels: each renders one part of a StudySnapshot."""
