"""The torch-free core: the decoder layer table, groups and costs, the criterion registry, the plan file, the
run tables, artifact writing, temporaries and the error type. Planning and sql run on it alone."""
