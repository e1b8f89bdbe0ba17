"""The application layer: one plain function per stage over typed inputs, each returning a result with
`to_json()`. The command line and the pipeline are thin adapters over it; `nenni_deploy.api` is its public face."""
