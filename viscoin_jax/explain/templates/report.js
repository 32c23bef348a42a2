// Interactive views of the report, no network: every frame is already an image in the page.
// A .slider shows frame i of the images in the element named by data-frames (src copied, not duplicated).
document.querySelectorAll(".slider").forEach(function (slider) {
  var frames = document.getElementById(slider.dataset.frames).querySelectorAll("img");
  var input = slider.querySelector("input"), view = slider.querySelector("img.frame");
  var label = slider.querySelector(".value");
  function show() {
    var frame = frames[Number(input.value)];
    view.src = frame.src;
    view.dataset.index = input.value;
    label.textContent = frame.alt;
  }
  input.addEventListener("input", show);
  show();
});
// A .switch shows one attribution method's maps (or all) in the block named by data-block.
document.querySelectorAll(".switch").forEach(function (sw) {
  var block = document.getElementById(sw.dataset.block);
  sw.querySelectorAll("input[type=radio]").forEach(function (radio) {
    radio.addEventListener("change", function () {
      block.querySelectorAll("[data-method]").forEach(function (el) {
        el.hidden = radio.value !== "all" && el.dataset.method !== radio.value;
      });
    });
  });
});
