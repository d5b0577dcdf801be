"""What trainer and worker share: settings, storage, imaging, the model artifact, statistics."""
