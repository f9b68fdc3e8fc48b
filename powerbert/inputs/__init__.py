"""What the commands read and check: tables of texts and labels, model folders, shared argument
checks, the movie-review download. Nothing is imported here (no torch at ``powerbert --help``).
"""
