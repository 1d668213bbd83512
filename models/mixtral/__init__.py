"""The Mixtral family: the Llama attention with a sparse mixture-of-experts feed-forward."""
