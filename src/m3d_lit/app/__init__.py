"""`m3d-lit app`: a local web page (Gradio) to look at a scan, ask the model about it and see the mask.

`engine` holds the model side, `scans` reads uploads and prepared scans, `view` draws the slices, `ui`
lays out the page and `server` is the command. Gradio is the optional extra `m3d-lit[app]`.
"""
