// Tells the page the viewer's time zone (minutes east of UTC), so times and plots read in local
// time; without JavaScript they are in UTC. Reloads once, only if the cookie was new and stuck.
(function () {
  var minutes = -new Date().getTimezoneOffset();
  var found = document.cookie.match(/(?:^|; )tz=(-?\d+)/);
  if (found && Number(found[1]) === minutes) return;
  document.cookie = "tz=" + minutes + "; path=/; SameSite=Strict; max-age=31536000";
  var stuck = document.cookie.match(/(?:^|; )tz=(-?\d+)/);
  if (stuck && Number(stuck[1]) === minutes) location.reload();
})();
