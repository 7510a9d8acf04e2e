"""Jobs: whole workflows (text -> activations -> SAEs -> reports) behind the command line."""
