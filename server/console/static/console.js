// Castellan console: draws each <canvas data-chart> with Chart.js (vendored), from the JSON the page carries.
"use strict";
(function () {
  function draw(canvas) {
    var spec = JSON.parse(canvas.getAttribute("data-chart"));
    var datasets = spec.series.map(function (s) {
      return { label: s.name, data: s.values, backgroundColor: s.color, borderColor: s.color, borderWidth: 1 };
    });
    // eslint-disable-next-line no-undef
    new Chart(canvas, {
      type: spec.kind,
      data: { labels: spec.labels, datasets: datasets },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        indexAxis: spec.horizontal ? "y" : "x",
        scales: { x: { stacked: spec.stacked }, y: { stacked: spec.stacked, beginAtZero: true } },
        plugins: { legend: { position: "bottom" } },
      },
    });
    canvas.setAttribute("data-drawn", "true");
  }
  function drawAll() {
    if (typeof Chart === "undefined") return;
    document.querySelectorAll("canvas[data-chart]:not([data-drawn])").forEach(draw);
  }
  document.addEventListener("DOMContentLoaded", drawAll);
  document.addEventListener("htmx:afterSettle", drawAll);
})();
