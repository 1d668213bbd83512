"""The Mixtral family: the shared block with a sparse mixture-of-experts feed-forward."""
