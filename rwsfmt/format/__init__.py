"""The `.rws` format's parts that grow with its versions: the storage schemes (`schemes`)."""
