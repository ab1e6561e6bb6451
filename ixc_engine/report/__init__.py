"""The cleaning report: one self-contained HTML file (plots as inline SVG, thumbnails as data: URIs) from a scores file
and its corpus. Needs the ``report`` extra (matplotlib, jinja2), imported only when a report is made."""
