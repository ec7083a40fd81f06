"""The models: the teacher, the student made from it, its export, and measures of both."""
