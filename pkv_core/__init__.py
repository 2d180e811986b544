"""What every layer of pkv-export shares and nothing else: the two kinds of failure the CLI tells apart."""
