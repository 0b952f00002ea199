"""What a deployed app needs: buckets, manifests, `Engine` and its backends, image/video I/O,
`sgex-run` and `sgex-bench`. Imports without torch; heavy libraries load inside functions."""
