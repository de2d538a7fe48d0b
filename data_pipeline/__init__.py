"""MEGA data pipeline: native-format readers, clip sampling, the Ray sharding job and the streaming loader."""
