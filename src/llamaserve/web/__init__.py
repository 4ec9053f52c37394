"""The dashboard's front end: Jinja2 page layouts and static scripts and styles (no build step, nothing fetched
at run time). static/vendor holds Chart.js 4.6.1 (MIT, chart.umd.min.js from the npm package, its LICENSE.md
beside it)."""
