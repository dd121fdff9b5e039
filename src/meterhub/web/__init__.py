"""The operator dashboard served by ``meterhub serve`` at ``/`` (see docs/dashboard.md).

Plain ES modules and uPlot, no build step; the static files ship inside the package.
:mod:`meterhub.web.router` serves the page, its files and the live event stream (``router`` and
``static_files()``); :mod:`meterhub.web.stream` fans protocol events out to the stream's clients.
"""
